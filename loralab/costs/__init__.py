"""What a run costs: parameters, bytes, time, memory and FLOPs."""
