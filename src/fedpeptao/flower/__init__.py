"""Any algorithm on Flower: the same algorithm core as the embedded simulator, across machines.

``fedpeptao.flower.server_app:app`` and ``fedpeptao.flower.client_app:app`` are the Flower
ServerApp and ClientApp (``flower_app/pyproject.toml`` names them for ``flwr run``); see
``docs/deployment.md``. Nothing is imported here, so that importing the package stays cheap.
"""
