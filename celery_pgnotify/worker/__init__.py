"""``celery-pg worker``: a dispatcher in the lineage of AWX's and dispatcherd's.

The main process consumes with a kombu ``ConsumerMixin`` and keeps ONE work
queue; idle children take the next job (:mod:`.pool`); children run each
task through Celery's own tracer (:mod:`.child`).
"""
