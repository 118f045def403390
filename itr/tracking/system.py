"""CPU, memory, disk, network and GPU utilisation through MLflow's own system-metrics monitor
(``system/...`` metrics, the run page's System metrics tab): one monitor per node, in the node's first process.

On one node the keys are MLflow's plain ``system/cpu_utilization_percentage``; on several, each node's are
``system/node<i>/...`` (MLflow's node id). GPU metrics need ``nvidia-ml-py`` and an NVIDIA driver. The monitor
samples every ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds (MLflow's default 10) and writes straight to
the store: these metrics are live only, not in the journal, and ``itr sync`` cannot bring them back.
"""
import logging
import os
import warnings

ENV_OFF = "ITR_SYSTEM_METRICS"  # "0" turns the monitors off


def enabled():
    return os.environ.get(ENV_OFF, "1") not in ("0", "false", "no")


def node_index(rank=None, local_world=None):
    """This process's node: SLURM_NODEID, else torchrun's GROUP_RANK / NODE_RANK, else rank // local world."""
    for var in ("SLURM_NODEID", "GROUP_RANK", "NODE_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1) if local_world is None else local_world
    return rank // max(local_world, 1)


class SystemMonitor:
    """MLflow's ``SystemMetricsMonitor`` on ``run_id``; never raises. ``node``: None on a single node."""

    def __init__(self, run_id, uri, node=None, resume=False):
        self.monitor = None
        if not (enabled() and run_id):
            return
        for name in ("mlflow.system_metrics", "mlflow.system_metrics.system_metrics_monitor"):
            logging.getLogger(name).setLevel(logging.WARNING)  # its start/stop and "no GPU" lines are noise here
        try:
            self.monitor = _monitor_class()(run_id, node_id=None if node is None else f"node{node}",
                                            resume_logging=resume, tracking_uri=uri)
            self.monitor.start()
        except Exception as e:  # psutil missing, an MLflow without the monitor, ...
            warnings.warn(f"MLflow system metrics are off ({type(e).__name__}: {e})")
            self.monitor = None

    def stop(self):
        """Stop sampling and flush. A run shorter than one sampling interval gets one sample taken now, so
        every run has its system metrics."""
        m, self.monitor = self.monitor, None
        if m is None:
            return
        try:
            m.finish()
            if m.published == 0:
                m.collect_metrics()
                m.publish_metrics(m.aggregate_metrics())
                m.mlflow_logger.flush()
        except Exception as e:
            warnings.warn(f"MLflow system metrics: the last sample was not logged ({type(e).__name__}: {e})")


def _monitor_class():
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class Monitor(SystemMetricsMonitor):
        """MLflow's monitor, counting what it published (``stop`` adds a sample to a run that has none)."""
        published = 0

        def publish_metrics(self, metrics):
            super().publish_metrics(metrics)
            self.published += 1

    return Monitor
