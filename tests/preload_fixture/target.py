"""A stand-in worker module for tests/test_preload.py: reports what it sees, then exits or waits."""
import json
import os
import sys
import time

from tests.preload_fixture import marker

if __name__ == "__main__":
    report = {"pid": os.getpid(), "marker_imported_in": marker.IMPORTED_IN, "env": os.environ.get("PRELOAD_TEST"),
              "name": __name__, "argv0": sys.argv[0],
              "comm": open("/proc/self/comm").read().strip(), "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    with open(os.environ["PRELOAD_TEST_OUT"], "w") as fh:
        json.dump(report, fh)
    print("target says hello", flush=True)
    if os.environ.get("PRELOAD_TEST_WAIT"):
        time.sleep(60)
    sys.exit(int(os.environ.get("PRELOAD_TEST_EXIT", "0")))
