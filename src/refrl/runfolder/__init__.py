"""The bottom floor: run-folder I/O that every other part of refrl builds on.

* `refrl.runfolder.layout`: the run folder's file names, checkpoint listing and resolution
  (``tiny-sft``, a run folder or a checkpoint folder -> the policy folder);
* `refrl.runfolder.files`: atomic (fsync'd) writes of files and folders, safe file names
  from data, output folders;
* `refrl.runfolder.lock`: one writer per run folder;
* `refrl.runfolder.rng`: seeded generators.

It imports nothing of refrl but `refrl.errors` (the import contract in pyproject.toml
checks it), so anything may use it and it never closes an import circle.
"""
