"""Query/retrieve batch jobs over archives and de-identified training-set export."""
