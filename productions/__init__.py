"""Productions: long scripts and dialogues made segment by segment, take by take, and rendered.

One module per job: ``splitting`` (plain text -> segment texts), ``script`` (speaker scripts and the
cast), ``srt`` (subtitle cues as timing targets), ``model`` (the frozen value types), ``render``
(chosen takes -> one loudness-normalised file streamed to disk), ``captions`` (SRT / WebVTT),
``output`` (a render's files and manifest on disk),
``service`` (creating, generating, choosing, editing, rendering), ``jobs`` (generation progress),
``take_checks`` (the quality hook: scores and timed words of every take), ``long_edit`` (edits of audio
longer than one model call). The tables live in ``userdata.productions``.
"""
