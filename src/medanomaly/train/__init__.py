"""The training loop (2D and 3D, both tasks, one process or DDP), checkpoints and resume, few-label methods, the GAN and the planner."""
