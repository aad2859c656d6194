def pipeline_class(kind):
    import diffusers
    return {"flux2-klein": diffusers.Flux2KleinPipeline, "qwen-edit-plus": diffusers.QwenImageEditPlusPipeline, "kontext": diffusers.FluxKontextPipeline}[kind]
