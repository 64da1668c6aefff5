"""Running a plan: the pipeline, the step cache, the run record, the guard, progress, the CPU's int8 class."""
