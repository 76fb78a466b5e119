"""moto's server, answering one request at a time.

moto 5 applies DynamoDB conditional writes without a lock, so two concurrent requests can
both pass a condition that DynamoDB itself would serialise (two lease winners, a quota
counter past its limit). Serving requests one by one gives the tests DynamoDB's per-item
atomicity. An SQS long poll (WaitTimeSeconds > 0) holds the server for its whole wait, so
the fan-out tests and bench poll with WaitTimeSeconds 0 (`worker --wait-seconds 0`).
Usage: python moto_serial.py HOST PORT
"""

import sys

from werkzeug.serving import run_simple

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(host, port, app, threaded=False, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
