"""The study report: collecting runs, tables, rendering and plots."""
