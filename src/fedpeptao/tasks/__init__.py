"""What the tuned backbone is trained for: one module per kind of task, registered by name
(``model.head``): ``linear``, ``mlm`` and ``lm`` classification (:mod:`.classification`), and
``generate``, generative instruction tuning (:mod:`.generative`)."""

from fedpeptao.tasks import classification  # noqa: F401  (registers the classification tasks)
from fedpeptao.tasks import generative  # noqa: F401  (registers the generative task)
from fedpeptao.tasks.base import TASKS, Batch, Output, Task, register_task, task_class

__all__ = ["TASKS", "Batch", "Output", "Task", "register_task", "task_class"]
