"""Change-stream readers (DynamoDB Streams, Supabase change log); plain Python, no Dagster import.

Import the reader you need from its module (``durability_pipelines.sources.dynamodb``) so that one
source's optional dependencies never load for another.
"""
