"""Attribution of GPU energy and cost to the workloads that used it.

:mod:`.identity` says who a process is (user, systemd unit, Slurm job, container,
Kubernetes pod) from ``/proc``; :mod:`.podresources` optionally maps GPU devices
to pods through the kubelet.
"""
