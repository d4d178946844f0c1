"""Files clex writes and reads back: output directories and their manifests, training runs, checkpoints.

Everything that can delete or replace a file lives here, so the rule "never touch a file clex did not
write" is checked in one place: ``outdir`` claims a directory and records what clex writes in it,
``records`` compares a file with its record, ``train_run`` and ``eval_run`` are the two kinds of output
directory, ``checkpoint`` saves and verifies training state without pickle, and ``atomic`` is the one way
a file is written. Imports only the standard library, torch, numpy and ``clex.errors``/``clex.jsonfile``.
"""
