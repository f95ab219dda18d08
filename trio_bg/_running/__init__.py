"""The nursery that runs tasks, with what keeps them, and its options."""
