"""The experiment layer: the only code that reads a whole ExperimentConfig and builds a run from it
(task, algorithm, privacy, secure aggregation, runtime).  Everything below it takes plain specs."""
