"""The CPU preview engine (eSpeak NG + WORLD), used when the Step-Audio-EditX models are absent.

Modules: ``engine`` (the :class:`tts_engine.contract.Engine` implementation), ``espeak`` (text to speech
through the bundled eSpeak NG library), ``text`` (language tags, script detection, sentences),
``voice`` (WORLD analysis, voice profiles, adaptation), ``effects`` (DSP edits and presets).
Importing this package loads no library and touches no model file.
"""
