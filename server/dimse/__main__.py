"""``python -m server.dimse FD``: the DIMSE listener process started by ``synthport serve``.

The resolved settings come as JSON in ``SYNTHPORT_DIMSE_CHILD_CONFIG`` (not on the
command line, where ``ps`` would show the database URL); readiness is reported on the
inherited file descriptor ``FD``.
"""
import json
import os
import sys

from server.dimse.server import CHILD_CONFIG_ENV, child_main

if __name__ == "__main__":
    config = json.loads(os.environ.pop(CHILD_CONFIG_ENV))
    sys.exit(child_main(config, int(sys.argv[1])))
