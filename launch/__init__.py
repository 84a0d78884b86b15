"""mie.launch: the shell and the cluster (CLI, configs, distributed environment, logging)."""
