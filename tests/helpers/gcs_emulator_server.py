"""`python -m helpers.gcs_emulator_server start ...`: gcp-storage-emulator, with the object's
generation on media downloads (`x-goog-generation`, as GCS sends it). tensorstore, which
writes orbax's arrays, reads an object's generation from that header and refuses the
conditional writes of its checkpoint manifests without it."""

from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # not found: the handler has answered 404
        return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", 1))


# The server's routing table takes the handler when its module is imported, so this runs
# first.
objects.download = _download_with_generation

from gcp_storage_emulator.__main__ import main  # noqa: E402

if __name__ == "__main__":
    main()
