"""Model stages and the Ray Serve deployments around them: one small class per stage, composed through handles.

Import the deployments from their modules (deployments.detector, .classifier, .classifier_pool); this package
itself imports nothing, so that the stage code and its types (deployments.results, .config, .stages) load
without Ray Serve.
"""
