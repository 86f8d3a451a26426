"""One module per expression preprocessing method; each calls ``spec.register(MethodSpec(...))``.

Modules here are discovered by ``hescape.preprocess.spec.load_methods`` (no import list to
keep): adding a method is adding a module (plus its test). Keep module-level imports light
(numpy, pydantic, hescape.preprocess.expression/spec); import heavy libraries inside ``run``.
"""
