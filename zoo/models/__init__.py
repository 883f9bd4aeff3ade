"""Model families; importing one registers it (zoo.registry). Add a line per new family file."""

import zoo.models.vae  # noqa: F401
import zoo.models.rbm  # noqa: F401
import zoo.models.lda  # noqa: F401
import zoo.models.dbn  # noqa: F401
import zoo.models.vit  # noqa: F401
import zoo.models.gpt  # noqa: F401
import zoo.models.seq2seq  # noqa: F401
import zoo.models.bert  # noqa: F401
import zoo.models.transformer  # noqa: F401
import zoo.models.score2d  # noqa: F401
import zoo.models.ddpm  # noqa: F401
import zoo.models.dit  # noqa: F401
