"""``python -m maxq ...`` (and ``torchrun ... -m maxq train``)."""

import logging
import os
import sys

from .cli import main


def _exit(code: int) -> None:
    """Exit with ``code``. A distributed worker (torchrun sets ``TORCHELASTIC_RUN_ID``; other launchers
    ``WORLD_SIZE``) skips the interpreter's teardown: PyTorch's gloo process group can abort the process there
    (``terminate called without an active exception``, exit -6) after a run that finished and wrote everything,
    which torchrun then reports as a failed run. By then every file is written and closed, and the process group
    destroyed: only the streams are left to flush."""
    if "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


_exit(main())
