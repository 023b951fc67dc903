"""tfp_realnvp: Real NVP density models on TensorFlow Probability and Keras 3."""

import setuptools

setuptools.setup(
    name='tfp_realnvp',
    version='0.1.0',
    description='Real NVP (Dinh et al., ICLR 2017) as TensorFlow Probability bijectors and a '
                'Keras 3 model: exact image densities in bits/dim, sampling, encode/decode.',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=setuptools.find_packages(include=['tfp_realnvp', 'tfp_realnvp.*', 'launch',
                                               'launch.*']),
    python_requires='>=3.10',
    install_requires=[
        'tensorflow>=2.21,<2.22',
        'keras>=3.15,<4',
        'tensorflow-probability[tf]>=0.25,<0.26',
        'tensorflow-datasets>=4.9.10',
        'importlib_resources>=6',
        'absl-py>=2.1',
        'tensorboard>=2.21',
        'numpy>=1.26,<3',
        'pillow>=10',
        'mlxtend>=0.23',
        'scikit-learn>=1.4',
    ],
    extras_require={'test': ['pytest>=8', 'pytest-xdist>=3.6']},
)
