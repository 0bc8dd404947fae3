"""Jobs to workers and results to destinations: scheduler, local pool, Celery, outbox."""
