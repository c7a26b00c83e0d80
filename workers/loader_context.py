"""Parallel data loading inside Celery's pool processes.

Celery's prefork pool runs tasks in daemonic processes, and the standard library refuses to let a
daemonic process start children ("daemonic processes are not allowed to have children"), which
is what DataLoader workers are. Celery's own multiprocessing fork, billiard, has no such rule: its
pool children are meant to be able to start processes. This context is the standard library's
fork context with billiard's Process class, so torch gets the context type it checks for while
the worker processes are started the billiard way. They are still torch's ordinary DataLoader
workers (daemonic, watching their parent), so they end with the task.
"""

import multiprocessing.context

import billiard.context


class PoolSafeForkContext(multiprocessing.context.ForkContext):
    Process = billiard.context.ForkProcess
