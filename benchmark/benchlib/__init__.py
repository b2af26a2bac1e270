"""benchmark/run split into modules: common, targets, scenarios, report, soak, joins, syscalls."""
