"""Built-in architectures; importing this package registers them."""

from .hps import HPS
from .task_connections import active_task, add_task_connections, has_task_connections

__all__ = ["HPS", "active_task", "add_task_connections", "has_task_connections"]
