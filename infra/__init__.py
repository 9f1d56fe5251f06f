"""Servers and hosts: what starts, supervises and tears down what runs beside the flows.

The local stack (``stack``: Prefect, MLflow, Evidently UI, the runner, optionally
``postgres``), its ``supervisor``, the network-namespace ``hosts`` and the ``cluster`` on them.
A floor between ``flows/`` (above: flows, deployments, CLI) and ``tasks/``: it never
imports ``flows/``.
"""
