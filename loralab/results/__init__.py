"""The results database that studies write and reports read."""
