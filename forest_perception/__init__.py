"""forest_perception: perception and learning stack for a swarm of small forest rovers."""
