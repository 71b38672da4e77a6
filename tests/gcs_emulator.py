"""Cloud Storage for the tests: gcp-storage-emulator, in memory, on 127.0.0.1.

    python tests/gcs_emulator.py PORT

The emulator is run as its own `start` command runs it (one request at a time, HTTP/1.0),
with two changes to the socket server it is served by, none to what it stores or
answers:
- a listen backlog that fits dozens of connections opened at once (Python's default of
  5 drops them, and each dropped one waits seconds for its retransmission);
- replies leave at once (TCP_NODELAY): the server writes a reply's headers and body
  separately, and Nagle's algorithm held the body for the client's delayed ACK, 0.2 s
  a request.
"""

import sys
from http import server

from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator.__main__ import main

BUCKET = "imagenet-jax-tests"

if __name__ == "__main__":
    server.HTTPServer.request_queue_size = 1024
    emulator_server.RequestHandler.disable_nagle_algorithm = True
    emulator_server.RequestHandler.timeout = 5  # a connection that sends nothing is dropped
    sys.exit(main(["start", "--host=127.0.0.1", f"--port={sys.argv[1]}", "--in-memory",
                   f"--default-bucket={BUCKET}", "--quiet"]))
