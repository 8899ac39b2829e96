"""The supervisor: the one process that owns the vhost-user socket, guest memory, the rings and
the used ring, in rooms by job (see vblk.supervisor.serve for how they fit):

=================  =======================================================================
module             its job
=================  =======================================================================
serve.py           the composition root: open, start, listen, run, stop -- in that order
loop.py            the event loop: epoll, timers, signals, adaptive polling, the nested wait
connection.py      the frontend's socket, its vhost-user Session, the backend channel
queues.py          the queue lifecycle the session drives: memory table, start/stop, inflight
datapath.py        kick -> drain -> admit -> slot -> engine -> complete -> used ring
pool.py            the worker processes (the engine of blocking backings)
inprocess.py       the engine of backings whose I/O completes on an eventfd (and of tests)
disk_ops.py        the operator's resize and limit, from the control socket
=================  =======================================================================
"""
