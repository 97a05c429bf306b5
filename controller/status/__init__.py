"""The gRPC status service a running controller serves (`tandem status` queries it).

    board.py        StatusBoard: the job's state, written by the loop, mirrored to the server
    server.py       the gRPC servicer, health and reflection; start_status_server (called by `Job`)
    process.py      the server's own process: the board's mirror behind the gRPC server
    link.py         the socket between the controller and that process
    status.proto    the service's messages; status_pb2*.py are generated from it (gen_stubs.py)
"""
