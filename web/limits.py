"""What one visitor may ask of the web app, and why each bound is where it is.

The page runs on a shared machine: each bound keeps one visitor's request
from taking the memory, disk or time of everyone else. Every refusal is one
message naming the input and the bound (:class:`facetron.errors.InvalidInputError`).
"""

from __future__ import annotations

#: photos per prepare: an identity LoRA needs 3-20 good photos; prepare detects and aligns each (about a
#: second per photo on CPU), so 30 leaves room for the ones it drops without a many-minute job
MAX_UPLOAD_FILES = 30
#: bytes per uploaded file (also Gradio's own upload limit, enforced while it receives the file): a
#: full-quality JPEG from a 24-MP camera is 6-12 MB; PNG screenshots of phone photos stay under 20 MB
MAX_UPLOAD_FILE_BYTES = 20 * 1024 * 1024
#: bytes of one prepare's uploads together: the staged copy and Gradio's cache hold them on disk twice
MAX_UPLOAD_TOTAL_BYTES = 200 * 1024 * 1024
#: pixels per image, read from the file's header before any pixel is decoded (a small compressed file can
#: declare a huge image): 24 MP covers a 6000x4000 camera photo; decoded RGB it is 72 MB, and prepare
#: and the template path scale it down to a few hundred pixels anyway
MAX_UPLOAD_PIXELS = 24_000_000
#: training steps per run: the default is 300 and a good identity LoRA on SD-1.5 converges within
#: 1000-1500; each step is seconds on CPU, so 2000 bounds a run to hours, not days
MAX_TRAIN_STEPS = 2000
#: jobs waiting in the queue (all users together); one job runs at a time (a generation is tens of
#: seconds, a training minutes on CPU), so a longer line only means waits nobody sits through
QUEUE_MAX_SIZE = 16
#: seconds a training stage (prepare or LoRA) may run before it is stopped
STAGE_TIMEOUT_S = 4 * 3600.0
