"""privbroker's root side: policy, opener, server and command line."""
