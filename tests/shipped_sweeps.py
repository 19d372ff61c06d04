"""Settings the test suite's small removal sweeps share (test_jobs, test_slurm, test_removal).

20 steps: the shipped model's images need ~20 PNDM steps (at 10 its colours saturate). Seed 1: on the
shipped model each of these captions draws a sun it does not name, so with the removal overlay's two
prompt shards every shard has two objects to remove. Blocks of 8 rows: the overlay's 32 would pad
these few images 4-fold.
"""

CAPTIONS = "dataset.captions=['a view at night','a view of the sky','a tree at night','a kite at night']"
REMOVAL = ["+sweep=removal", "steps=20", "seeds=[1]", CAPTIONS, "fixed_rows=8"]
