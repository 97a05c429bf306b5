# One model layered onto a Tandem image. `tandem image build --model DIR` runs this once per
# model, after deploy/Dockerfile, with the model's directory as the build context:
#
#   docker build -f deploy/model.Dockerfile -t TAG --build-arg BASE_IMAGE=TAG \
#       --build-arg MODEL_NAME=NAME --label dev.tandem.model.NAME=/opt/tandem/models/NAME DIR
#
# BASE_IMAGE is the Tandem image just built under the same tag, found in the local image store
# (docker's default builder; a docker-container buildx builder would look in the registry). The
# label records the model's path in the image; labels add up across the layers, so the final
# image carries one per model. deploy/model.Dockerfile.dockerignore leaves out what a git clone
# or a Hugging Face download keeps beside the weights.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
ARG MODEL_NAME
# Owned by the job's user (uid 1000), so files saved with mode 0600 stay readable by the job.
COPY --chown=1000:1000 . /opt/tandem/models/${MODEL_NAME}/
