"""A run's logic, written once for both transports: :mod:`~fedpeptao.engine.rounds` (the server
side of a round) and :mod:`~fedpeptao.engine.worker` (what a device does on a message)."""
