"""Mirror and audit: keeping Redis and Postgres in step, and proving nothing was lost.

Plain Python (pandas, psycopg, redis); the Dagster assets in ``defs/assets.py``
only call into here.
"""
