"""Running the model: the pure step, pools of streams, meshes, offline and sharded forwards."""
