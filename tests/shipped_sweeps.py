"""Settings the test suite's small removal sweeps share (test_jobs, test_slurm, test_removal).

20 steps: the shipped model's images need ~20 PNDM steps (at 10 its colours saturate). Seed 1: on the
shipped model each of these captions draws a sun it does not name, so with the removal overlay's two
prompt shards every shard has one object to remove. Fixed rows off: these few images would pay
their blocks' padding (648 instead of 396 UNet rows a four-caption job in blocks of 8); the tests that
use this sweep compare runs made the same way, not images across batch sizes (tests/test_determinism.py
does).
"""

CAPTIONS = "dataset.captions=['a view at night','a view of the sky']"
REMOVAL = ["+sweep=removal", "steps=20", "seeds=[1]", CAPTIONS, "fixed_rows=0"]
