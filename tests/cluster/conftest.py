"""The SLURM cluster the tests under tests/cluster/ submit to: started once per session,
stopped at its end (also on Ctrl-C, a failure or a SIGTERM), its daemons' logs added to the
report of every test that fails."""

import signal

import pytest

from cluster.slurm_cluster import ClusterUnavailable, SlurmCluster

_cluster: SlurmCluster | None = None


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A running cluster of node1 and node2, both idle. Where none can start here, every
    test that needs it fails with the reason: never skipped, so a machine that cannot run
    them never reads as green."""
    global _cluster
    # A SIGTERM (a CI timeout, kill) takes the same way out as Ctrl-C, through the teardown.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    started = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        started.start()
        why = None
    except ClusterUnavailable as e:
        why = str(e)
    if why is not None:
        started.stop()
        signal.signal(signal.SIGTERM, previous)
        pytest.fail(f"no SLURM cluster: {why}", pytrace=False)
    _cluster = started
    try:
        yield started
    finally:
        _cluster = None
        started.stop()
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _cluster is not None:
        report.sections.append(("SLURM daemons' logs", _cluster.logs()))
