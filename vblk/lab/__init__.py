"""vblk's lab: tooling around the device backend, never part of what ``vblk serve`` runs.

Measuring (``vblk bench``: the Python-frontend client, the vblk-vs-qsd comparison, fio in
the test guest, the scaling table) and the real Linux test guest with its add-ons and the
``vblk demo`` built on it. The runtime (``vblk.daemon``, ``vblk.supervisor``, the workers)
never imports this package; ``vblk.cli`` and ``vblk.testing`` may.
"""
