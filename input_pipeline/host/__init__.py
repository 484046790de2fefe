"""The process and its peers: the layer under both ``train/`` and ``input_pipeline/``.

``storage`` (files on local disks and object stores), ``settings`` (the process settings every
entry point applies by an explicit call), ``distributed`` (starting ``jax.distributed``),
``agreement`` (decisions taken once and agreed by every process) and ``command`` (what every
``python -m ...`` command shares: flags, logging, ``loom: error:`` lines, exit codes).

It imports no other package of Loom, so the data package and the training package can both stand
on it; it lives inside ``input_pipeline/`` because the top level of the repository is fixed and
this is the lowest package that needs it. Importing any of it changes nothing in the process.
"""
