"""Pipeline parallelism: layers split into chunks (partition), schedules as per-rank action lists
(schedules), the one executor that runs any list (executor), and a simulator for deadlocks and bubbles
(sim)."""
