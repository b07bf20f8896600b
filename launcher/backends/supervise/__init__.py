"""Running a BackendSpec: the supervisor (readiness, health, restarts, stop), the runtimes it
starts a child through (`process` local, `container` docker), the parent-death signal
(`deathsig`) and the classification of a failed load (`failure`)."""
