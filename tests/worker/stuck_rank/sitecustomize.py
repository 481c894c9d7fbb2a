"""TEST ONLY: put first on PYTHONPATH of one worker of tests/worker/test_distributed_training.py,
this makes rank 1 of every multi-device run hang at interpreter start, before it can connect back
to its worker (a rank stuck in torchrun's rendezvous or in a slow import looks the same to the
worker). Python imports `sitecustomize` at start-up from the path; nothing else imports this."""

import os
import time

if os.environ.get("RANK") == "1":
    time.sleep(3600)
