"""What keeps a long run alive: the run guard (resume, rollback, stop agreement), the watchdog thread,
control signals, numeric and straggler detectors, fault injection for tests, and the event log.
The numerics never import this package; they record progress through threefold.parallel.track."""
