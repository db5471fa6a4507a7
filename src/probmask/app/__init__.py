"""The experiment application: configuration, registries, data, models, methods, the runner and the
command line. It builds on the library (:mod:`probmask`), which never imports it."""
