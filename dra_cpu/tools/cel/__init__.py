"""CEL as the scheduler evaluates DRA device selectors: library (the environment), check (static checks),
selector (compile and evaluate with the reason for false)."""
