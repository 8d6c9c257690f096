"""The task-independent stages and the pipeline that runs them; it imports the adapter contract, never an adapter."""
